"""Metrics: one JSON object per line (metrics.jsonl); the table and curves.png are in plots.py.

Records carry `kind` ("train" per optimizer step, "eval" per evaluation point) and `run` (e.g.
"spin" or "sft"), so several runs of one demo share a file. Only rank 0 writes.
"""
import json
import math
import os

import torch

from .parallel.mesh import all_reduce_sum

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
    written); on resume, drops records past the checkpoint's step first. `sinks` (report_to.py)
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
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(_line(record) for record in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


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
