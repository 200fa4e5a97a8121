"""What a run reports: metrics.jsonl (one JSON record per line), the same records sent to
TensorBoard or wandb (--report-to, as TRL's `report_to`), and plain progress lines for a log file.
Only rank 0 reports. The results table and curves.png are in plots.py.

Records carry `kind` ("train" per optimizer step, "eval" per evaluation point) and `run` (e.g.
"spin" or "sft"), so several runs of one demo share a file.
"""
import functools
import importlib
import json
import math
import os
import time
from contextlib import contextmanager

import torch

from .errors import UsageError, option
from .manifest import replaced_atomically
from .parallel.mesh import all_reduce_sum
from .plots import table_columns

# Wall-clock measurements of a step: the only fields that differ between two identical runs.
TIMING_KEYS = ("step_time", "tokens_per_second")


def strict_json(value):
    """`value` with every NaN or infinity replaced by None: metrics.jsonl holds strict JSON only
    (json.dumps would write NaN/Infinity, which other JSON readers reject)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _line(record):
    return json.dumps(strict_json(record), sort_keys=True, allow_nan=False) + "\n"


class MetricsLog:
    """Appends records to `path`, each flushed and fsynced (a kill loses at most the line being
    written); on resume, drops records past the checkpoint's step first. `sinks` (below)
    receive every record too."""

    def __init__(self, path, enabled=True, sinks=()):
        self.path = path
        self.enabled = enabled
        self.sinks = list(sinks) if enabled else []
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, record):
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(_line(record))
            f.flush()
            os.fsync(f.fileno())
        for sink in self.sinks:
            sink.write(record)

    def close(self):
        for sink in self.sinks:
            sink.close()

    def truncate_after(self, run, step):
        """Removes `run`'s records with step > `step` (written after the checkpoint we resume from)."""
        for sink in self.sinks:
            sink.truncate_after(step)
        if not self.enabled or not os.path.exists(self.path):
            return
        kept = [r for r in read_records(self.path)
                if r.get("run") != run or r.get("step", 0) <= step]
        with replaced_atomically(self.path) as f:
            f.writelines(_line(record) for record in kept)


def read_records(path):
    """The records of a metrics.jsonl. A last line cut short (a kill or a full disk while it was
    written) is dropped with a warning; an unreadable line before it is an error naming it."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(number, line) for number, line in enumerate(f, start=1) if line.strip()]
    records = []
    for index, (number, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if index < len(lines) - 1:
                raise ValueError(f"{path}:{number}: not a JSON record ({exc.msg})") from exc
            print(f"warning: {path}:{number}: the last line is cut short (was the run killed while writing it?); "
                   f"dropped it")
    return records


def global_step_metrics(sums, dp_group):
    """A step's micro-batch sums summed over the data-parallel ranks, as floats; the rewards' std
    from the global Σr, Σr² and count (Bessel-corrected; 0 for a single reward)."""
    names = sorted(sums)
    stacked = all_reduce_sum(torch.stack([sums[n].double().reshape(()) for n in names]), dp_group)
    result = dict(zip(names, stacked.tolist()))
    count, total, squares = (result.pop(k) for k in ("rewards_count", "rewards_sum", "rewards_sq_sum"))
    result["rewards_all_std"] = (math.sqrt(max(0.0, (squares - total * total / count) / (count - 1)))
                                 if count >= 2 else 0.0)
    return result


# ---- TensorBoard and wandb (report_to): each number of a record is one scalar `<kind>/<key>` at its step
def check_installed(names):
    """A clear error before any work when a chosen integration's package (named as it) is missing."""
    for name in names:
        if name == "none":
            continue
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise UsageError(f"{option('report_to')} {name}: the {name!r} package is not installed "
                             f"(pip install 'spin_kernels[report]')") from exc


def scalars(record):
    """{"<kind>/<key>": value} of a record's finite numbers (the step is the x axis, not a value)."""
    return {f"{record['kind']}/{key}": float(value) for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


class TensorBoardSink:
    """Event files in `log_dir`. On resume, the writer opens with purge_step past the checkpoint, so
    TensorBoard drops what the interrupted run logged after it (as metrics.jsonl does)."""

    def __init__(self, log_dir):
        self.log_dir, self.purge_step, self.writer = log_dir, None, None

    def truncate_after(self, step):
        self.purge_step = step + 1 if step >= 0 else None

    def write(self, record):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=self.log_dir, purge_step=self.purge_step, flush_secs=30)
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])

    def close(self):
        if self.writer is not None:
            self.writer.close()


class WandbSink:
    """A wandb run in OUT/wandb (WANDB_MODE, WANDB_PROJECT and the other WANDB_* variables apply; the
    project defaults to "spin-train"), with the run's settings as its config, started at once so that
    a wandb that cannot start (not logged in) stops the run before the model loads. A resumed run is a
    new wandb run that starts at the checkpoint's step."""

    def __init__(self, out, settings):
        import wandb
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "spin-train"), dir=out,
                                  name=os.path.basename(os.path.abspath(out)), config=settings)
        except wandb.errors.Error as exc:
            raise UsageError(f"{option('report_to')} wandb: wandb could not start a run ({exc}); log in with "
                             f"`wandb login` or set WANDB_MODE=offline") from exc

    def truncate_after(self, step):
        pass

    def write(self, record):
        self.run.log(scalars(record), step=record["step"])

    def close(self):
        self.run.finish()


def make_sinks(names, out, settings):
    """The sinks of --report-to `names` for a run writing to `out` (on rank 0 only)."""
    sinks = []
    if "tensorboard" in names:
        sinks.append(TensorBoardSink(os.path.join(out, "runs")))
    if "wandb" in names:
        sinks.append(WandbSink(out, settings))
    return sinks


# ---- plain progress lines for a log file (stdout redirected: SLURM, nohup), each flushed -----------
flushed_print = functools.partial(print, flush=True)   # a message reaches a log file now, not when the buffer fills


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

    def __init__(self, enabled=False, every=0, clock=time.monotonic):
        self.enabled, self.every, self.clock = enabled, every, clock

    def say(self, text):
        if self.enabled:
            print(text, flush=True)

    def begin(self, total_steps, iterations, done):
        self.total_steps, self.iterations, self.done_before, self.started = total_steps, iterations, done, self.clock()

    def step(self, record):
        step = record["step"]
        if not (self.enabled and self.every) or (step % self.every and step != self.total_steps):
            return
        elapsed = self.clock() - self.started
        eta = elapsed / max(1, step - self.done_before) * (self.total_steps - step)
        self.say(f"iteration {record['iteration']}/{self.iterations}  step {step}/{self.total_steps}  "
                 f"loss {record['loss']:.4f}  acc {record['acc']:.3f}  margin {record['margin_mean']:+.4f}  "
                 f"lr {record['lr']:.3e}  tokens/s {record['tokens_per_second']:.0f}  elapsed {duration(elapsed)}  "
                 f"ETA {duration(eta)}")

    def eval(self, row):
        self.say(eval_line(row))

    @contextmanager
    def phase(self, what):
        self.say(f"{what}: started")
        began = self.clock()
        yield
        self.say(f"{what}: done in {duration(self.clock() - began)}")
