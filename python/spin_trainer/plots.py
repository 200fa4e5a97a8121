"""What a person reads: the per-iteration table and curves.png, for one run or several seeds.

Rows are eval records (one per iteration end; iteration 0 is the starting model). Rows averaged
over seeds (`mean_rows`) carry `<key>_se`, the standard error over the seeds, printed as ±.
"""
import math
import os

TABLE_COLUMNS = (
    ("iteration", "iter", "{:d}"), ("step", "step", "{:d}"), ("exact_match", "test exact match", "{:.3f}"),
    ("val_sft_loss", "SFT val loss", "{:.4f}"),
    ("spin_acc_start", "SPIN acc start", "{:.2f}"), ("spin_acc_end", "SPIN acc end", "{:.2f}"),
    ("margin_start", "margin start", "{:+.3f}"), ("margin_end", "margin end", "{:+.3f}"),
    ("gen_equals_gold", "gen = gold", "{:.3f}"), ("val_spin_acc", "val SPIN acc", "{:.3f}"),
    ("gen_length", "gen length", "{:.2f}"),
)
TABLE_LEGEND = ("SPIN acc / margin start and end: training means over the first and the last quarter of the "
                "iteration's steps (margin = β·(r_actual − r_generated); at the first step the policy is the "
                "reference, so both are 0). gen = gold: fraction of the training prompts whose sampled response, "
                "made at the iteration's start, equals the gold one (such pairs give SPIN no gradient).")

# One colour per run in every panel; seeds of a run share it.
RUN_COLOURS = {"sft_start": "0.45", "sft": "tab:blue", "spin": "tab:orange"}
RUN_LABELS = {"sft_start": "SFT start", "sft": "continued SFT", "spin": "SPIN"}


def mean_and_se(values):
    """(mean, standard error of the mean); the error is None for fewer than 2 values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def mean_rows(rows_by_seed):
    """Per-iteration means over seeds of every numeric value all seeds have, with `<key>_se`."""
    lengths = {len(rows) for rows in rows_by_seed}
    assert len(lengths) == 1, f"seeds have different numbers of rows: {sorted(lengths)}"
    averaged = []
    for rows in zip(*rows_by_seed):
        row = {"iteration": rows[0]["iteration"], "step": rows[0]["step"], "seeds": len(rows)}
        for key in rows[0]:
            values = [r.get(key) for r in rows]
            if key in row or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                continue
            row[key], row[f"{key}_se"] = mean_and_se(values)
        averaged.append(row)
    return averaged


def format_table(rows, title):
    """Plain-text table of eval rows; missing values print as '-', `<key>_se` as ± after exact match."""
    header = [label for _, label, _ in TABLE_COLUMNS]
    body = []
    for row in rows:
        cells = []
        for key, _, fmt in TABLE_COLUMNS:
            value = row.get(key)
            cell = "-" if value is None else fmt.format(value)
            if key == "exact_match" and row.get(f"{key}_se") is not None:
                cell += " ± " + fmt.format(row[f"{key}_se"])
            cells.append(cell)
        body.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths))
    out = [title, line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in body]
    return "\n".join(out)


def _points(records, run, kind, key):
    points = [(r["step"], r[key]) for r in records
              if r.get("kind") == kind and r.get("run") == run and r.get(key) is not None]
    if key == "gen_equals_gold":
        # Logged with the iteration's end; the responses were sampled at its start (the previous end).
        ends = sorted(r["step"] for r in records if r.get("kind") == "eval" and r.get("run") == run)
        points = [(max([e for e in ends if e < step], default=0), value) for step, value in points]
    return points


# (title, x label, y label, kind, key, runs it applies to; None: every run but the start)
PANELS = (
    ("SFT start: loss", "SFT step", "loss per response token", "start", None, ("sft_start",)),
    ("continued SFT: training loss", "optimizer steps after the start", "loss per response token",
     "train", "sft_loss", ("sft",)),
    ("SPIN: training loss", "optimizer steps after the start", "SPIN loss", "train", "loss", ("spin",)),
    ("held-out exact match", "optimizer steps after the start", "test exact match", "eval", "exact_match", None),
    ("SPIN acc per step", "optimizer steps after the start", "acc (margin > 0)", "train", "acc", ("spin",)),
    ("reward margin per step", "optimizer steps after the start", "β·(r_actual − r_generated)", "train",
     "margin_mean", ("spin",)),
    ("generations equal to gold", "optimizer steps after the start (iteration start)",
     "fraction of train prompts", "eval", "gen_equals_gold", ("spin",)),
    ("SFT validation loss", "optimizer steps after the start", "loss per response token", "eval", "val_sft_loss",
     None),
)


def plot_curves(record_sets, path, runs):
    """curves.png from metrics records: `record_sets` is one list of records per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw_curves(record_sets, runs)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def draw_curves(record_sets, runs):
    """The figure of plot_curves: one panel per quantity that has data, one colour per run.

    The start's SFT run (run "sft_start") gets its own panel, so that the SPIN-vs-SFT region is not
    squashed by it; every other panel counts steps from the start. Eval panels draw each seed thin
    and the mean over seeds thick (with ± standard error bars when there are several seeds).
    """
    import matplotlib.pyplot as plt

    panels = []
    for title, xlabel, ylabel, kind, key, applies in PANELS:
        chosen = [run for run in runs if (run in applies if applies else run != "sft_start")]
        if kind == "start":
            has_data = any(_points(records, run, "train", "sft_loss") for records in record_sets for run in chosen)
        else:
            has_data = any(_points(records, run, kind, key) for records in record_sets for run in chosen)
        if has_data:
            panels.append((title, xlabel, ylabel, kind, key, chosen))
    cols = max(1, min(4, len(panels)))
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, xlabel, ylabel, kind, key, chosen) in zip(axes.flat, panels):
        for run in chosen:
            colour, label = RUN_COLOURS.get(run), RUN_LABELS.get(run, run)
            if kind == "start":
                _draw_start(ax, record_sets, run, colour, label)
            elif kind == "train":
                for i, records in enumerate(record_sets):
                    points = _points(records, run, kind, key)
                    if points:
                        ax.plot(*zip(*points), color=colour, linewidth=0.8, alpha=0.6, label=label if i == 0 else None)
            else:
                _draw_eval(ax, record_sets, run, key, colour, label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _draw_start(ax, record_sets, run, colour, label):
    """The start's training loss per step (thin) and its validation loss at each evaluation (dots)."""
    for i, records in enumerate(record_sets):
        train = _points(records, run, "train", "sft_loss")
        val = _points(records, run, "eval", "val_sft_loss")
        if train:
            ax.plot(*zip(*train), color=colour, linewidth=0.6, alpha=0.5,
                    label=f"{label}: training" if i == 0 else None)
        if val:
            ax.plot(*zip(*val), color="black", marker=".", linestyle="none", markersize=3,
                    label=f"{label}: validation" if i == 0 else None)


def _draw_eval(ax, record_sets, run, key, colour, label):
    per_seed = [dict(_points(records, run, "eval", key)) for records in record_sets]
    per_seed = [points for points in per_seed if points]
    if not per_seed:
        return
    if len(per_seed) > 1:
        for points in per_seed:
            ax.plot(list(points), list(points.values()), color=colour, linewidth=0.6, alpha=0.35)
    steps = sorted(set.intersection(*(set(points) for points in per_seed)))
    stats = [mean_and_se([points[s] for points in per_seed]) for s in steps]
    means = [m for m, _ in stats]
    errors = [se or 0.0 for _, se in stats] if len(per_seed) > 1 else None
    ax.errorbar(steps, means, yerr=errors, color=colour, marker="o", markersize=3, linewidth=1.6, capsize=2,
                label=label if len(per_seed) == 1 else f"{label} (mean ± s.e., {len(per_seed)} seeds)")
