"""The learning-rate schedule (warm-up, constant/linear/cosine, restart per iteration), the epoch
order and the batch-size arithmetic that the SPIN loop and the SFT runs share."""
import math

import pytest

from spin_trainer.options import parse_config
from spin_trainer.errors import UsageError
from spin_trainer.optim import epoch_order, learning_rate_schedule, warmup_steps_for


def rates(schedule, total):
    return [schedule(step) for step in range(total)]


def test_paper_recipe_linear_decay_with_ten_percent_warmup_restarts_every_iteration():
    # Two iterations of 20 and 10 steps, peak rates 5e-7 and 1e-7; 10 % warm-up: 2 and 1 steps.
    lr_at = learning_rate_schedule([5e-7, 1e-7], [20, 10], shape="linear", warmup_ratio=0.1)
    first, second = rates(lr_at, 30)[:20], rates(lr_at, 30)[20:]
    assert first[:4] == pytest.approx([2.5e-7, 5e-7, 5e-7, 5e-7 * 17 / 18])
    assert first[-1] == pytest.approx(5e-7 / 18)           # decays to lr / (S − w), as HF's last step
    assert all(a > b for a, b in zip(first[2:], first[3:]))
    assert second[0] == pytest.approx(1e-7) and second[1] == pytest.approx(1e-7)   # w = ceil(0.1 · 10) = 1
    assert second[-1] == pytest.approx(1e-7 / 9)


def test_cosine_and_constant_shapes():
    cosine = rates(learning_rate_schedule([1.0], [11], shape="cosine", warmup_steps=1), 11)
    assert cosine[0] == 1.0 and cosine[1] == 1.0
    assert cosine[6] == pytest.approx(0.5) and cosine[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
    constant = rates(learning_rate_schedule([2.0], [6], warmup_steps=4), 6)
    assert constant == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]      # the first step already moves
    with pytest.raises(SystemExit):   # the command line offers the shapes there are
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
