"""What the SPIN loop carries between steps: where it is, the current iteration's data, and
whether a stop was asked for.

The position and the data are saved in every checkpoint (as plain dicts of their fields), so that
a resumed run continues mid-iteration with the same generations and reference log-probs.
"""
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .parallel.mesh import all_reduce_max


class TrainingStopped(Exception):
    """Raised after SIGTERM once the checkpoint is written; carries its path."""


class StopSignal:
    """SIGTERM sets a flag; `received()` tells every rank whether any rank got it (a collective)."""

    def __init__(self, ctx):
        self.ctx, self.requested = ctx, False

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            self.requested = True

        previous = signal.signal(signal.SIGTERM, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def received(self):
        flag = torch.tensor([1.0 if self.requested else 0.0], device=self.ctx.device)
        return all_reduce_max(flag, self.ctx.world_size).item() > 0


@dataclass
class LoopPosition:
    iteration: int = 0     # 0-based: iteration t trains θ_t -> θ_t+1
    epoch: int = 0         # within the iteration
    step: int = 0          # optimizer steps done in this epoch
    global_step: int = 0   # optimizer steps done in the run

    def state(self):
        return dict(vars(self))

    @classmethod
    def from_state(cls, state):
        return cls(**state)


@dataclass
class IterationData:
    """The iteration's pairs, θ_t's generations and the reference log-probs, made while the model held θ_t."""
    examples: list                      # the prompts' Examples, then the pairs mixed in from the previous iteration
    generated: list                     # θ_t's response ids, one per example
    ref_logps: torch.Tensor | None      # [P, 2] (actual, generated) reference sums; precompute mode only
    val_generated: list                 # θ_t's responses to the validation prompts
    val_ref_logps: torch.Tensor | None  # [V, 2]
    generated_epoch: int                # the epoch these generations were sampled at
    train_gen_length: float             # mean length of the responses to the training prompts
    history: list = field(default_factory=list)   # the iteration's per-step training records
    gen_equals_gold: float | None = None          # fraction of training prompts answered exactly (no gradient)

    def state(self):
        return dict(vars(self))   # shallow: the Examples stay Examples

    @classmethod
    def from_state(cls, state):
        return None if state is None else cls(**state)
