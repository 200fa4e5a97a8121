"""Metrics: one JSON object per line (metrics.jsonl), the per-iteration table, curves.png.

Records carry `kind` ("train" per optimizer step, "eval" per evaluation point) and `run` (e.g.
"spin" or "sft"), so several runs of one demo share a file. Only rank 0 writes.
"""
import json
import math
import os

TABLE_COLUMNS = (
    ("iteration", "iter", "{:d}"), ("step", "step", "{:d}"), ("exact_match", "exact-match", "{:.3f}"),
    ("val_sft_loss", "SFT val loss", "{:.4f}"), ("spin_acc", "SPIN acc", "{:.3f}"),
    ("val_spin_acc", "val SPIN acc", "{:.3f}"), ("rewards_actual", "reward actual", "{:+.4f}"),
    ("rewards_generated", "reward gen", "{:+.4f}"), ("gen_length", "gen length", "{:.2f}"),
)


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
    written); on resume, drops records past the checkpoint's step first."""

    def __init__(self, path, enabled=True, report=print):
        self.path = path
        self.enabled = enabled
        self.report = report
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, record):
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(_line(record))
            f.flush()
            os.fsync(f.fileno())

    def truncate_after(self, run, step):
        """Removes `run`'s records with step > `step` (written after the checkpoint we resume from)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept = [r for r in read_records(self.path, report=self.report)
                if r.get("run") != run or r.get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(_line(record) for record in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def read_records(path, report=print):
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
            report(f"warning: {path}:{number}: the last line is cut short (was the run killed while writing it?); "
                   f"dropped it")
    return records


def format_table(rows, title):
    """Plain-text table of eval rows (dicts); missing values print as '-'."""
    header = [label for _, label, _ in TABLE_COLUMNS]
    body = []
    for row in rows:
        cells = []
        for key, _, fmt in TABLE_COLUMNS:
            value = row.get(key)
            cells.append("-" if value is None else fmt.format(value))
        body.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths))
    out = [title, line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in body]
    return "\n".join(out)


def plot_curves(records, path, runs, offsets=None):
    """curves.png: held-out exact match and SFT validation loss per run, SPIN loss and acc per step.

    `offsets` shifts a run's steps (e.g. runs that start where a warm-up ended) on the x axis.
    """
    offsets = offsets or {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = ((axes[0][0], "eval", "exact_match", "held-out exact match"),
              (axes[0][1], "eval", "val_sft_loss", "SFT validation loss"),
              (axes[1][0], "train", "loss", "training loss"),
              (axes[1][1], "train", "acc", "SPIN acc (actual preferred)"))
    for ax, kind, key, title in panels:
        for run in runs:
            shift = offsets.get(run, 0)
            points = [(r["step"] + shift, r[key]) for r in records
                      if r.get("kind") == kind and r.get("run") == run and r.get(key) is not None]
            if kind == "train" and key == "loss":
                points = [(r["step"] + shift, r.get("loss", r.get("sft_loss"))) for r in records
                          if r.get("kind") == "train" and r.get("run") == run]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if kind == "eval" else None, label=run)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return path
