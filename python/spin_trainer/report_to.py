"""--report-to: the records of metrics.jsonl, also sent to TensorBoard (OUT/runs/) or wandb, as
TRL's `report_to`. Each number of a record is one scalar named `<kind>/<key>` ("train/loss",
"eval/val_sft_loss") at the record's optimizer step. Only rank 0 reports (MetricsLog's sinks)."""
import importlib
import math
import os

from .errors import UsageError, option

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_installed(names):
    """A clear error before any work when a chosen integration's package is missing."""
    for name in names:
        if name == "none":
            continue
        try:
            importlib.import_module(PACKAGES[name])
        except ImportError as exc:
            raise UsageError(f"{option('report_to')} {name}: the {PACKAGES[name]!r} package is not installed "
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
