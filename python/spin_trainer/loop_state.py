"""What the SPIN loop carries between steps: where it is and the current iteration's data (saved in
every checkpoint as the dicts of their fields, `vars()`, shallow: the Examples stay Examples, so that
a resumed run continues mid-iteration with the same generations and reference log-probs), and whether
a stop was asked for."""
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .parallel.mesh import all_reduce_max


# The signals that stop a run with a checkpoint: SIGTERM (a scheduler's preemption, `kill`) and
# SIGINT (Ctrl-C; under torchrun, which forwards the signal it got to its workers as that signal).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(Exception):
    """Raised after a stop signal once the checkpoint is written: `checkpoint` (its path), the
    signal's `signal_name` and `exit_status`, what a shell reports for a process the signal ended."""

    def __init__(self, checkpoint, signal_number):
        super().__init__(checkpoint)
        self.checkpoint, self.signal_name = checkpoint, signal.Signals(signal_number).name
        self.exit_status = 128 + signal_number


class StopSignal:
    """SIGTERM or SIGINT sets a flag (off the main thread, where no handler can be installed, none
    does); `received()` tells every rank the signal any rank got (a collective), 0 if none."""

    def __init__(self, ctx):
        self.ctx, self.signal_number = ctx, 0

    @contextmanager
    def installed(self):
        def request_stop(signum, frame):
            self.signal_number = self.signal_number or signum   # the first one is what the user did

        on_main_thread = threading.current_thread() is threading.main_thread()
        previous = {number: signal.signal(number, request_stop) for number in STOP_SIGNALS} if on_main_thread else {}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def received(self):
        flag = torch.tensor([float(self.signal_number)], device=self.ctx.device)
        return int(all_reduce_max(flag, self.ctx.world_size).item())


@dataclass
class LoopPosition:
    iteration: int = 0     # 0-based: iteration t trains θ_t -> θ_t+1
    epoch: int = 0         # within the iteration
    step: int = 0          # optimizer steps done in this epoch
    global_step: int = 0   # optimizer steps done in the run


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
    dropped_truncated: int | None = None          # pairs --drop-truncated left out (None: not asked for)
