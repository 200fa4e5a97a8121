"""Plain progress lines for a log file (stdout redirected: SLURM, nohup), where a progress bar's
redraws would be lost or pile up: one line every `--log-every` optimizer steps, one when each
generation or evaluation phase starts and ends, and one per evaluation row. Each is flushed, so a
batch job's log shows the run as it goes. Only rank 0 prints."""
import sys
import time
from contextlib import contextmanager

from .plots import table_columns


def flushed_print(text):
    """A message that reaches a log file now, not when the buffer fills."""
    print(text, flush=True)


def plain_lines_wanted(stdout_is_terminal, progress_bar_shown):
    """On a terminal the progress bar is the display; the lines are for a log file, or for a
    terminal without a bar (--no-progress)."""
    return not stdout_is_terminal or not progress_bar_shown


def duration(seconds):
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def step_line(record, total_steps, iterations, elapsed, eta):
    return (f"iteration {record['iteration']}/{iterations}  step {record['step']}/{total_steps}  "
            f"loss {record['loss']:.4f}  acc {record['acc']:.3f}  margin {record['margin_mean']:+.4f}  "
            f"lr {record['lr']:.3e}  tokens/s {record['tokens_per_second']:.0f}  elapsed {duration(elapsed)}  "
            f"ETA {duration(eta)}")


def eval_line(row):
    """The row's numbers, labelled as in the results table (those it has)."""
    cells = [f"{label} {fmt.format(row[key])}" for key, label, fmt in table_columns([row])[2:]
             if row.get(key) is not None]
    where = f"{row['kind']} at iteration {row['iteration']}, step {row['step']}"
    return f"{where}: " + ("  ".join(cells) if cells else "no held-out data")


class ProgressLines:
    """`begin(total_steps, iterations, done)` as the loop starts (`done`: steps of a resumed run), then
    `step(record)` per optimizer step, `eval(row)` per evaluation row, `phase(what)` around long work.
    The ETA is the time per step so far in this process, generation and evaluation included, times
    the steps left."""

    def __init__(self, enabled=False, every=0, stream=None, clock=time.monotonic):
        self.enabled, self.every, self.stream, self.clock = enabled, every, stream, clock
        self.total_steps = self.iterations = self.done_before = 0
        self.started = clock()

    def say(self, text):
        if self.enabled:
            print(text, file=self.stream or sys.stdout, flush=True)

    def begin(self, total_steps, iterations, done):
        self.total_steps, self.iterations, self.done_before, self.started = total_steps, iterations, done, self.clock()

    def step(self, record):
        step = record["step"]
        if not (self.enabled and self.every) or (step % self.every and step != self.total_steps):
            return
        elapsed = self.clock() - self.started
        done_here = max(1, step - self.done_before)
        self.say(step_line(record, self.total_steps, self.iterations, elapsed,
                           elapsed / done_here * (self.total_steps - step)))

    def eval(self, row):
        self.say(eval_line(row))

    @contextmanager
    def phase(self, what):
        self.say(f"{what}: started")
        began = self.clock()
        yield
        self.say(f"{what}: done in {duration(self.clock() - began)}")
