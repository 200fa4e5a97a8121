"""What an optimizer step sees, shared by the SPIN loop and the SFT runs: the order of the
examples in an epoch, the learning rate of each step, and the batch-size arithmetic.

Learning rate, per SPIN iteration (the schedule restarts at each iteration, as the paper's recipe
does: linear decay with 10 % warm-up, each iteration a fresh run from θ_t). With S steps in the
iteration, w warm-up steps and k = 0 .. S-1 the step within it:

    warm-up    lr · (k + 1) / w                       for k < w (the first step already moves)
    constant   lr
    linear     lr · (S − k) / (S − w)                 from lr at k = w down to lr / (S − w)
    cosine     lr · (1 + cos(π · (k − w) / (S − w))) / 2

w = ceil(warmup_ratio · S) as in Hugging Face's Trainer, or --warmup-steps when given (which, as
there, overrides the ratio).
"""
import math

import torch

LR_SCHEDULES = ("constant", "linear", "cosine")


def epoch_order(count, seed, iteration, epoch):
    """The permutation of `count` examples for (seed, iteration, epoch), the same on every rank."""
    generator = torch.Generator().manual_seed(seed * 7919 + iteration * 104_729 + epoch)
    return torch.randperm(count, generator=generator).tolist()


def warmup_steps_for(steps, *, warmup_ratio=0.0, warmup_steps=0):
    """Warm-up steps of a run of `steps` steps: `warmup_steps` if > 0, else ceil(ratio · steps)
    (more warm-up steps than steps, as in Hugging Face's Trainer, never reach the peak rate)."""
    return warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * steps)


def lr_factor(k, steps, warmup, shape):
    """The multiplier of the peak learning rate at step `k` of a run of `steps` steps."""
    if k < warmup:
        return (k + 1) / warmup
    if shape == "constant" or steps <= warmup:
        return 1.0
    progress = (k - warmup) / (steps - warmup)
    if shape == "linear":
        return 1.0 - progress
    assert shape == "cosine", shape
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def learning_rate_schedule(lrs, steps_per_iteration, *, shape="constant", warmup_ratio=0.0, warmup_steps=0):
    """global step -> lr: iteration t's rate `lrs[t]`, shaped over its `steps_per_iteration[t]` steps."""
    if shape not in LR_SCHEDULES:
        raise ValueError(f"--lr-schedule must be one of {LR_SCHEDULES}, got {shape!r}")

    def lr_at(step):
        start = 0
        for lr, steps in zip(lrs, steps_per_iteration):
            if step < start + steps:
                warmup = warmup_steps_for(steps, warmup_ratio=warmup_ratio, warmup_steps=warmup_steps)
                return lr * lr_factor(step - start, steps, warmup, shape)
            start += steps
        return lrs[-1]
    return lr_at


class StepScheduler:
    """Sets every parameter group's learning rate to `lr_at(k)` for optimizer step k.

    Its state is the step count alone: the parameter groups follow the device meshes
    (spin_trainer.optim), so a checkpoint resumed onto another process count or --tp may have
    another number of groups, which torch's LambdaLR state (one base lr per group) would refuse.
    """

    def __init__(self, optimizer, lr_at):
        self.optimizer, self.lr_at, self.steps = optimizer, lr_at, 0
        self._apply()

    def _apply(self):
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.steps)

    def step(self):
        self.steps += 1
        self._apply()

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = int(state["steps"])
        self._apply()


def make_scheduler(optimizer, learning_rate_at):
    """Drives the optimizer's learning rate entirely: step k uses lr_at(k)."""
    return StepScheduler(optimizer, learning_rate_at)


def check_batch_sizes(global_batch_size, micro_batch_size, dp_size, count, what):
    """ValueError naming the options unless a global batch splits into whole micro-batches on every
    data-parallel rank and `count` items (`what`) hold at least one global batch."""
    for option, value in (("--micro-batch-size", micro_batch_size), ("--global-batch-size", global_batch_size)):
        if value < 1:
            raise ValueError(f"{option} must be >= 1, got {value}")
    if global_batch_size % (micro_batch_size * dp_size) != 0:
        raise ValueError(f"--global-batch-size {global_batch_size} must be a multiple of --micro-batch-size "
                         f"{micro_batch_size} x data-parallel size {dp_size}")
    if count < global_batch_size:
        raise ValueError(f"--global-batch-size {global_batch_size} is larger than the {count} {what}")


def micro_batches_per_step(global_batch_size, micro_batch_size, dp_size):
    return global_batch_size // (micro_batch_size * dp_size)
